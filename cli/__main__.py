"""`python -m cli ...` == `covidseg ...`."""
import sys

from cli import main

sys.exit(main())
