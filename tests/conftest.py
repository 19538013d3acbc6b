"""Shared pytest set-up. Fixtures live in tests/fixtures/*.py, one module per part, registered here."""
pytest_plugins = [
    "tests.fixtures.bundles",
    "tests.fixtures.data",
    "tests.fixtures.trained",
    "tests.fixtures.clip",
    "tests.fixtures.triton",
    "tests.fixtures.gateway",
    "tests.fixtures.browser",
]
