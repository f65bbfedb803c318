"""mmengine adapter: a hook running the pipeline inside a Runner."""
