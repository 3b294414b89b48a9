"""What drives the networks, and the handles passed between nodes: prompt building and AR sampling, glyph
conditioning, the flow schedule and decoder sampling, reference images, upscaling, captioning, CogView4 text
encoding, live previews."""
