"""The render process's background control: what runs beside the job, off the denoising path.

- `job_control.JobControl`: the job in hand, shared by the runner, the engine's step callback and
  the threads below (progress written in memory, cancel read from memory).
- `lease_keeper.LeaseKeeper`: renews the job's lease, writes its progress, notices a cancel request.
- `beacon.FleetBeacon`: advertises the worker (models held, memory, current job) in Redis.
- `recovery.RecoveryLoop`: the fleet's recovery pass (expired leases, lost messages, deferral bound).
"""
