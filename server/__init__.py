"""The donor: loads a shard, serves it on the mesh, batches sessions, bounds memory. (Not built yet.)"""
