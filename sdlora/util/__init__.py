"""Small helpers with no sdlora concepts: atomic writes, allocator settings, JSONL logs, tables."""
