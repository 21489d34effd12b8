from sidecar.process.cli import main

raise SystemExit(main())
