"""The student: made from the teacher by ETD (extraction, DynaBERT importance), a pretrained one, or random."""
