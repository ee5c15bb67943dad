"""`python -m kdkit.pipelines.native`: build the CPU operator now (scripts/setup.sh runs it)."""
import sys

from kdkit.pipelines.native import main

sys.exit(main())
