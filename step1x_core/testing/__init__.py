"""Tiny random Step1X-Edit models in the real file formats, for tests and smoke runs."""
