"""`python -m cllm.cli`: the `cllm` command."""

import sys

from cllm.cli import main

sys.exit(main())
