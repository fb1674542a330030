"""`python -m proxy` is the `fal-gateway-proxy` command."""

from .cli import main

raise SystemExit(main())
