-- title: Conversations inactive for more than N days
-- answers: Which conversations that are not closed have had no update for more than N days?
--   idle_since is date_updated, which Twilio moves on every change to the conversation;
--   date_inactive is its inactivity timer (timers.date_inactive: when Twilio marks, or
--   marked, the conversation inactive). members: users in it now, as far as convsync knows.
-- params: $1 days = 30
SELECT c.chat_service_sid,
       c.conversation_sid,
       c.friendly_name,
       c.conversation_state,
       c.date_updated AS idle_since,
       floor(extract(epoch FROM now() - c.date_updated) / 86400)::integer AS days_idle,
       c.date_inactive,
       count(v.user_sid) AS members
FROM conversations AS c
LEFT JOIN user_conversations_v AS v
       ON v.chat_service_sid = c.chat_service_sid AND v.conversation_sid = c.conversation_sid
WHERE c.conversation_state IS DISTINCT FROM 'closed'
  AND c.date_updated < now() - make_interval(days => $1::integer)
GROUP BY c.chat_service_sid, c.conversation_sid
ORDER BY c.date_updated, c.chat_service_sid, c.conversation_sid;
