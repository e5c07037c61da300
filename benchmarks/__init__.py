"""Project benchmarks beside the package's harness (`fastft bench`): the seed loop alone (`baseline_seed`), data
loaders (`data_bench`), the model-zoo record (`zoo_table`). They import fastft; fastft never imports them."""
