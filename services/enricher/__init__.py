"""The model data enricher: keeps each subject's recent events from the events topic and
adds them, as `subject_state`, to every scoring task on its way to the models."""
