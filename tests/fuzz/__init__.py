"""Property-based fuzzing (hypothesis) of everything that parses bytes or text from outside.

Run with ``python -m pytest tests/fuzz``; ``HYPOTHESIS_PROFILE=long`` multiplies every budget
(see ``tests/fuzz/conftest.py``).  Coverage-guided harnesses live in ``fuzz/atheris/``.
"""
