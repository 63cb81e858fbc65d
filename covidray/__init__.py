"""covidray: chest X-ray scoring for COVID-19 and pneumonia, with Grad-CAM, on Ray."""

__version__ = "0.1.0"
