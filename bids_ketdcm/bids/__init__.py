"""The BIDS contract: finding inputs (pybids layout), naming and reading/writing derivatives."""
