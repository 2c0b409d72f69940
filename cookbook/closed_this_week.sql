-- title: Conversations closed this week
-- answers: Which conversations closed since Monday 00:00 (in the session's TimeZone)?
--   Uses Twilio's close timer, timers.date_closed (column date_closed), once it has passed.
--   A conversation closed by setting its state, without a timer, has no date_closed and is
--   not listed: find those with conversation_state = 'closed' and changed_at.
-- params: none
SELECT c.chat_service_sid,
       c.conversation_sid,
       c.friendly_name,
       c.conversation_state,
       c.date_closed,
       count(v.user_sid) AS members
FROM conversations AS c
LEFT JOIN user_conversations_v AS v
       ON v.chat_service_sid = c.chat_service_sid AND v.conversation_sid = c.conversation_sid
WHERE c.date_closed >= date_trunc('week', now())
  AND c.date_closed <= now()
GROUP BY c.chat_service_sid, c.conversation_sid
ORDER BY c.date_closed DESC, c.chat_service_sid, c.conversation_sid;
