"""Thin Ray plumbing: actor wrappers and cluster start-up. The maths lives in core/."""
