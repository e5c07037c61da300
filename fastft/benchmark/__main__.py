from fastft.benchmark.cli import main

raise SystemExit(main())
