"""Fuzz targets (hypothesis): hostile rings, vhost-user streams and block requests."""
