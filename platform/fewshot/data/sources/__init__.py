"""One converter per dataset source; each yields `Example`s into `store.write_store`."""
