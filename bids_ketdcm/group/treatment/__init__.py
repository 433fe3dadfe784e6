"""Ketamine-vs-placebo treatment selection: one module per step.

``methods`` (the learners and fixed policies), ``dpnn`` (the prototype network), ``metrics``
(RPL, MRR, response rate, tests), ``cv`` (cross-validation), ``cohort`` (the crossover
cohort and the options), ``workflow`` (:func:`run_treatment_selection`, the group level's
entry point).
"""
