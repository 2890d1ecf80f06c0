# The contract tests of auxframe's kit, over this package's entry points (auxframe_packages in
# pyproject.toml); tests/test_auxframe_example.py imports them.
pytest_plugins = ["auxframe.testing.plugin"]
