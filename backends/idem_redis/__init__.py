"""Redis store for idem-core: one hash per record, one Lua script per transition."""
