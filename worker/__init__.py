"""convsync: a resumable, typed sync of Twilio Conversations into PostgreSQL."""
