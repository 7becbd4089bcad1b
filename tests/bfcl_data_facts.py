"""Facts about the BFCL v3 data that nvidia-bfcl 26.3 ships, shared by the tests that read it."""

# Items per category.
BFCL_CATEGORY_SIZES = {
    "simple": 400,
    "java": 100,
    "javascript": 50,
    "multiple": 200,
    "parallel": 200,
    "parallel_multiple": 200,
    "live_simple": 258,
    "live_multiple": 1053,
    "live_parallel": 16,
    "live_parallel_multiple": 24,
    "irrelevance": 240,
    "live_irrelevance": 882,
    "live_relevance": 18,
}
