"""A plugin module that cannot be imported, as when a plugin's own dependency is missing."""

raise ImportError(
    "auxframe_broken.broken_import needs the package 'auxframe-missing-dependency', which is not "
    "installed (this failure is deliberate; the module exists for auxframe's tests)"
)
