"""Loaded by pytest before anything else (it sits at the root): test-wide XLA flags.

The tests check numbers, not speed, and most of their time is XLA compiling small
programs. LLVM's optimization of the generated CPU code is most of that compile time
and changes no result the tests compare (matmuls and convolutions run in the same
libraries either way), so the suite compiles at backend optimization level 0: about
half the time of a test like the study's loops. Set XLA_FLAGS yourself to override.
XLA reads the flags when the first computation starts, which is after this runs.
"""

import os

if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
    ).strip()
