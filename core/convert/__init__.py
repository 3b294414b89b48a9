"""Writing a release's weights in other formats (scaled FP8, GGUF): above the models, whose specs say what each
tensor becomes."""
