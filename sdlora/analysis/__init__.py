"""sdlora inspect: per-module maths, report, plots, intruder mitigation."""
