"""mean-nav: GNSS-free drone navigation by cross-view geo-localization."""
__version__ = "0.1.0"
