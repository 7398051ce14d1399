"""Test configuration: 8 virtual CPU devices (sharding tests run anywhere) and strict dtypes."""

import hypothesis
import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")

hypothesis.settings.register_profile(
    "gradsafe", max_examples=40, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile("gradsafe")
