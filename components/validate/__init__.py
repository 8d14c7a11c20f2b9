"""The validate step: Great Expectations suites over the canonical tables."""

import logging

# Set before any submodule imports GX: it logs dozens of INFO lines on import and per context.
logging.getLogger("great_expectations").setLevel(logging.WARNING)
