"""Participant level: fMRIPrep BOLD -> ROI time series -> spectral DCM (and GMV, predictions) -> derivatives."""
