"""The small instruction datasets the default recipe trains on, shipped inside the package (see iso_dates)."""
