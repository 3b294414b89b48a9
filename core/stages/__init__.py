"""The stages that drive the networks: prompt building and AR sampling, glyph conditioning, the flow schedule and
decoder sampling, reference images, upscaling, CogView4 text encoding."""
