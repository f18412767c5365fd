"""Command front-ends (demo, export, inspect): argument handling and output; no training maths here."""
