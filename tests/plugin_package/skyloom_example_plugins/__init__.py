"""Example third-party skyloom plugins: a sampler, a safety filter and a prompt enhancer."""
