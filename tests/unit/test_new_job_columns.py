"""`lifecycle.new_job`: the columns of a new job, inserted by the ORM (`submit`) and without it (`submit_now`, one
statement on the event loop). A column the model fills from a Python-side default must be among them, or a job
submitted on the loop would be stored without it."""

from __future__ import annotations

from shared.db.models import Job
from shared.jobs import lifecycle


def test_every_python_side_default_is_a_column_of_a_new_job() -> None:
    values = lifecycle.new_job(owner="o", api_key_id=1, params={"seed": 7, "mode": "txt2img"}, model_name="m",
                               route="render", max_attempts=3, priority=0, published=True)
    defaulted = {column.name for column in Job.__table__.columns
                 if column.default is not None and column.server_default is None}
    assert defaulted and defaulted <= set(values), defaulted - set(values)
    assert values["status"] == "queued" and values["seed"] == 7 and values["published_at"] is not None
