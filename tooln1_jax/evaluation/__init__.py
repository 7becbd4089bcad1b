"""Benchmarks the paper reports: BFCL v3 (`bfcl`) and API-Bank level-1 call mode (`api_bank`)."""
