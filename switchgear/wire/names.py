"""Names both planes hold to the same rule (pure: no I/O, no generated code)."""

from __future__ import annotations

import re

#: A capability name, as a request names one (InvokeRequest.required_capabilities,
#: `x-switchgear-require`) and so as a service or target must offer it to be found.
CAPABILITY_NAME = re.compile(r"[a-z0-9_.:-]{1,64}")
CAPABILITY_RULE = "each 1..64 characters of a-z, 0-9, '_', '.', ':' or '-'"
