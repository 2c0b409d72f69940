-- title: Who joined or left which conversation since a date
-- answers: Membership changes convsync saw since a time, newest first. joined: the user first
--   appeared in the conversation (memberships.first_seen_at; a user's first sync counts all
--   of its conversations as joined); left: a complete listing of the user no longer had it
--   (memberships.removed_at). Times are when convsync noticed, not when it happened; a user
--   who left and came back shows as neither (rejoining clears removed_at).
-- params: $1 since = 2025-01-01T00:00:00Z
SELECT e.event,
       e.at,
       m.chat_service_sid,
       m.user_sid,
       u.identity,
       m.conversation_sid,
       c.friendly_name
FROM memberships AS m
CROSS JOIN LATERAL (VALUES ('joined', m.first_seen_at), ('left', m.removed_at)) AS e (event, at)
JOIN users AS u ON u.chat_service_sid = m.chat_service_sid AND u.user_sid = m.user_sid
JOIN conversations AS c
  ON c.chat_service_sid = m.chat_service_sid AND c.conversation_sid = m.conversation_sid
WHERE e.at >= $1::timestamptz
ORDER BY e.at DESC, m.chat_service_sid, m.user_sid, m.conversation_sid, e.event;
