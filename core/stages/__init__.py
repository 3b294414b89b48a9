"""What drives the networks, and the handles passed between nodes: the sampler settings, prompt building and AR
sampling (local, batched for the AR service, or on a remote server), glyph conditioning, the flow schedule and
decoder sampling, reference images, upscaling, captioning, CogView4 text encoding, live previews, the system
check."""
