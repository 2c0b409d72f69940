-- title: Busiest conversations
-- answers: Which conversations have the most members now, and how much is unread in them?
--   members counts users in the conversation as convsync knows them (users it syncs).
-- params: $1 top = 10
SELECT c.chat_service_sid,
       c.conversation_sid,
       c.friendly_name,
       c.conversation_state,
       count(*) AS members,
       coalesce(sum(v.unread_messages_count), 0)::bigint AS unread_messages,
       count(*) FILTER (WHERE v.notification_level = 'muted') AS muted_by
FROM user_conversations_v AS v
JOIN conversations AS c
  ON c.chat_service_sid = v.chat_service_sid AND c.conversation_sid = v.conversation_sid
GROUP BY c.chat_service_sid, c.conversation_sid
ORDER BY members DESC, c.chat_service_sid, c.conversation_sid
LIMIT $1::integer;
