"""Built-in job templates and recipes, shipped inside the wheel as ``hpcbridge.templates``."""
