"""OpenStack Cinder volume driver for snapfs (``volume_driver = cinder_driver.driver.SnapfsDriver``).

See README.md in this directory for the configuration and the connection type."""
