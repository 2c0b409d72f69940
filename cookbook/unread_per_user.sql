-- title: Unread messages per user
-- answers: Who has unread messages, and how many, over the conversations they are in now?
--   unread_messages sums Twilio's unread_messages_count; conversations_with_unread counts
--   those with any; muted_unread is the part in conversations the user muted; never_read
--   counts conversations the user has never read (Twilio gives them no unread count).
-- params: $1 min_unread = 1
SELECT v.chat_service_sid,
       v.user_sid,
       u.identity,
       coalesce(sum(v.unread_messages_count), 0)::bigint AS unread_messages,
       count(*) FILTER (WHERE v.unread_messages_count > 0) AS conversations_with_unread,
       coalesce(sum(v.unread_messages_count) FILTER (WHERE v.notification_level = 'muted'),
                0)::bigint AS muted_unread,
       count(*) FILTER (WHERE v.last_read_message_index IS NULL) AS never_read
FROM user_conversations_v AS v
JOIN users AS u ON u.chat_service_sid = v.chat_service_sid AND u.user_sid = v.user_sid
GROUP BY v.chat_service_sid, v.user_sid, u.identity
HAVING coalesce(sum(v.unread_messages_count), 0) >= $1::integer
ORDER BY unread_messages DESC, v.chat_service_sid, v.user_sid;
