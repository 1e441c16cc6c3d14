from gsae.cli import main

raise SystemExit(main())
