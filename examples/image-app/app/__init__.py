"""The example's package: what the wheel holds."""

VERSION = "1.2.3"
