"""The prediction service: Flask under gunicorn in front of the exported SavedModel."""
