"""promptq's worker: Celery workers that run queued prompts through LiteLLM. A map of it follows.

How a prompt flows, hop by hop:

1. ``api_client`` validates the request (``_requests``) and, in one Lua script
   (``_publish``), queues a Celery task message (``_task_messages``) in the scheduler's
   waiting structure (``_schedule``: by lane, priority and tenant) with the job's state and
   a copy of its request (every key: ``api_client._constants``), and wakes an idle worker.
2. ``promptq worker`` (``cli.worker_command``; N processes under ``cli.supervisor``) runs the Celery
   app (``app.celery_app``). Its transport (``app.queue_guard``) takes the best job waiting
   with one script (``fleet.schedule``) into the process's own list in Redis
   (``fleet.custody``), so a killed process loses nothing; what is not a promptq message is
   dropped there.
3. The task (``app.tasks``) turns the message into deliveries, one per job
   (``attempt.delivery``), and hands them to ``attempt.jobs``: the Celery-free core, which
   runs on an explicit ``attempt.runtime.Runtime`` (settings, Redis, store, limiter, spend,
   parking, metrics, the call loop). A job another Celery app sent by name (the public
   contract, ``api_client._celery_contract``) keeps its Celery request context
   (``app.canvas``) and is first taken in (``attempt.adopt`` over ``fleet.adoption``): given
   a submitted job's keys and queued in the scheduler by its priority and tenant.
4. Each job is marked running (``attempt.begin`` over ``fleet.store``; an invalid or
   cancelled one ends there) and attempted on the process's event loop
   (``attempt.call_loop``, ``attempt.run``): it takes a rate-limit slot (``attempt.throttle``
   over ``fleet.limiter``; with none soon it goes back in line, ``fleet.schedule``), sets
   money aside under a spending cap (``fleet.spend``), and
   makes one provider call through LiteLLM (``llm.call``: its arguments, the worker's
   sampling defaults and the prompt's length check; content transforms in ``llm.content``,
   the answer read in ``llm.answers``).
5. The outcome: an answer is stored, final (``fleet.store``; a job from another Celery app
   gets Celery's records in the same scripts, and its canvas runs after its end as a
   promptq.followup message, ``app.canvas``); a failure is classified
   (``attempt.classify``) and either stored or retried after the retry policy's wait
   (``attempt.retry``); a 429 whose Retry-After is longer than any backoff pauses the
   deployment, and the job waits in line (``attempt.throttle``). A retry's or a hand-back's
   wait goes one way: the job is parked in Redis until due (``attempt.later`` over
   ``fleet.parking``); a job waiting for its rate limit waits in the scheduler's line. Then
   Celery acknowledges the message; if Redis could not be reached, the message is rejected
   back to the queue instead.
6. The client reads the outcome (``api_client``); ``promptq batch`` (``batch``) does so for a
   whole JSONL file.

Beside the flow: dead processes' messages go back to the queue (``fleet.custody``), and a
safety net re-publishes jobs whose message was lost anyway (``fleet.reconcile``). A client
cancels jobs in Redis (``api_client._cancel``, whose Lua every end of a job goes through);
a worker ends a job without an answer, failed, cancelled or past its deadline
(``attempt.stop``), and the
parking mover also sweeps the jobs waiting past their deadline (``fleet.deadlines``);
``ops`` holds the metrics, ``promptq status`` and ``promptq config``; ``fake_provider`` is an
OpenAI-compatible server for trying promptq without a provider.

Packages import only the layers beneath them (tests/unit/test_architecture.py pins it):
``settings`` (over ``settings_sources``, ``config_file``: what of an OpenHands config is
passed by, and ``tenant_weights``) and ``errors`` (every worker exception) at the bottom;
then ``fleet`` (state in Redis) and ``llm`` (the LiteLLM boundary); ``ops``; ``attempt`` (one
attempt of one job); ``app`` (the Celery shell); ``batch`` and ``cli`` on top.
"""
