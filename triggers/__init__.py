"""The SQL that migrator installs into the legacy database (read by migrator.deltalog)."""
